//! A real recursive resolver (unbound) on a lab host, for knocks that reach
//! the server only through a resolver, as most do in the wild.
//!
//! It resolves the knock zone through a stub zone pointing at the lab's server
//! (and any extra nameservers), with the habits the tests switch on and off:
//! QNAME minimisation, 0x20 case randomisation, EDNS Client Subnet, TCP to the
//! server. It listens and sends from one lab address, accepts queries from the
//! whole lab, logs to a file, and is killed on drop.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use super::config::ZONE;
use super::dig::Dig;
use super::process::Process;
use super::{Netns, SERVER_V4};

/// What the resolver does differently from unbound's defaults.
#[derive(Clone, Debug)]
pub struct UnboundOpts {
    pub qname_minimisation: bool,
    pub caps_for_id: bool,
    /// Send EDNS Client Subnet (the client's /32) to the nameservers.
    pub ecs: bool,
    /// Talk to the nameservers over TCP only.
    pub tcp_upstream: bool,
    /// More nameservers of the zone besides the lab's server.
    pub extra_stub: Vec<IpAddr>,
    /// unbound's `verbosity` (1: operational messages; 0: errors only).
    pub verbosity: u8,
}

impl Default for UnboundOpts {
    fn default() -> Self {
        UnboundOpts {
            qname_minimisation: false,
            caps_for_id: false,
            ecs: false,
            tcp_upstream: false,
            extra_stub: Vec::new(),
            verbosity: 1,
        }
    }
}

/// A running unbound; killed on drop.
#[derive(Debug)]
pub struct Unbound {
    process: Process,
}

impl Unbound {
    /// The resolver's process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Writes `unbound.conf` into `dir` (created if need be) and starts unbound
    /// in `ns` on `listen`:53; ready once it resolves `ns1.<zone>` through the stub.
    pub fn start(ns: &Netns, listen: Ipv4Addr, dir: &Path, o: &UnboundOpts) -> anyhow::Result<Unbound> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let conf = dir.join("unbound.conf");
        std::fs::write(&conf, config_text(listen, dir, o))?;
        let conf = conf.to_str().context("unbound.conf path is not UTF-8")?;
        let mut cmd = ns.cmd("unbound");
        cmd.args(["-d", "-c", conf]);
        let mut process = Process::spawn("unbound", &mut cmd, &dir.join("unbound.log"))?;
        let (at, name) = (format!("@{listen}"), format!("ns1.{ZONE}"));
        process.wait_ready(Duration::from_secs(20), |_| {
            Dig::run(ns, &[&at, &name, "A", "+time=1", "+tries=1"]).is_ok_and(|d| d.status == "NOERROR")
        })?;
        Ok(Unbound { process })
    }

    pub fn log(&self) -> PathBuf {
        self.process.log().to_owned()
    }

    pub fn log_text(&self) -> String {
        self.process.log_text()
    }
}

fn config_text(listen: Ipv4Addr, dir: &Path, o: &UnboundOpts) -> String {
    let yn = |b: bool| if b { "yes" } else { "no" };
    let mut c = format!(
        "server:\n    interface: {listen}\n    outgoing-interface: {listen}\n    port: 53\n\
         \x20   access-control: 198.18.0.0/15 allow\n    do-daemonize: no\n    username: \"\"\n    chroot: \"\"\n\
         \x20   directory: \"{dir}\"\n    pidfile: \"\"\n    use-syslog: no\n    logfile: \"\"\n    verbosity: {v}\n\
         \x20   num-threads: 1\n    do-ip6: no\n    do-not-query-localhost: no\n\
         \x20   qname-minimisation: {qm}\n    use-caps-for-id: {caps}\n    tcp-upstream: {tcp}\n\
         \x20   harden-referral-path: no\n    domain-insecure: \"{ZONE}\"\n",
        dir = dir.display(),
        v = o.verbosity,
        qm = yn(o.qname_minimisation),
        caps = yn(o.caps_for_id),
        tcp = yn(o.tcp_upstream),
    );
    let nameservers: Vec<IpAddr> = std::iter::once(IpAddr::V4(SERVER_V4)).chain(o.extra_stub.iter().copied()).collect();
    if o.ecs {
        c.push_str("    module-config: \"subnetcache iterator\"\n");
        for s in &nameservers {
            let _ = writeln!(c, "    send-client-subnet: {s}");
        }
        c.push_str("    max-client-subnet-ipv4: 32\n    client-subnet-always-forward: yes\n");
    } else {
        c.push_str("    module-config: \"iterator\"\n");
    }
    let _ = write!(c, "remote-control:\n    control-enable: no\nstub-zone:\n    name: \"{ZONE}\"\n");
    for s in &nameservers {
        let _ = writeln!(c, "    stub-addr: {s}");
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_every_nameserver_as_stub_and_ecs_target() {
        let o = UnboundOpts { ecs: true, extra_stub: vec!["198.18.0.6".parse().unwrap()], ..Default::default() };
        let c = config_text(Ipv4Addr::new(198, 18, 0, 4), Path::new("/tmp/u"), &o);
        for s in ["198.18.0.1", "198.18.0.6"] {
            assert!(c.contains(&format!("stub-addr: {s}\n")), "{c}");
            assert!(c.contains(&format!("send-client-subnet: {s}\n")), "{c}");
        }
        assert!(c.contains("interface: 198.18.0.4\n") && c.contains("subnetcache iterator"), "{c}");
        let plain = config_text(Ipv4Addr::new(198, 18, 0, 4), Path::new("/tmp/u"), &UnboundOpts::default());
        assert!(!plain.contains("send-client-subnet") && plain.contains("module-config: \"iterator\""), "{plain}");
    }
}

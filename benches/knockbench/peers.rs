//! The daemons nxknock is measured against or through: knotd (the DNS rate
//! baseline, same zone), unbound (the resolver path), fwknopd and knockd
//! (knock-to-open). Each runs inside the lab with its files in the run
//! directory and is stopped (SIGTERM, then SIGKILL) when dropped.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use nxknock::lab::Netns;
use nxknock::lab::process::Process;
use nxknock::lab::unbound::{Unbound, UnboundOpts};

use crate::users::random_bytes;
use crate::{Bench, RESOLVER};

/// fwknopd's SPA port.
pub(crate) const FWKNOP_PORT: u16 = 62201;
/// knockd's sequence.
pub(crate) const KNOCKD_PORTS: [u16; 3] = [7000, 8000, 9000];

/// `args[0] args[1..]` in `ns`, output to `log`; SIGTERM and 3 s before SIGKILL on drop.
fn spawn(ns: &Netns, args: &[&str], log: &Path) -> Result<Process> {
    let (program, rest) = args.split_first().context("a program to run")?;
    Ok(Process::spawn(program, ns.cmd(program).args(rest), log)?.with_grace(Duration::from_secs(3)))
}

impl Bench {
    /// knotd on the server's address, serving the lab zone.
    pub(crate) fn start_knotd(&self) -> Result<Process> {
        nxknock::lab::knotd::start(self.srv(), &self.dir)
    }

    /// unbound on the resolver host, as packaged (QNAME minimisation on, no 0x20),
    /// quiet, with the lab's server as the zone's stub.
    pub(crate) fn start_unbound(&self) -> Result<Unbound> {
        let o = UnboundOpts { qname_minimisation: true, verbosity: 0, ..UnboundOpts::default() };
        Unbound::start(self.res(), RESOLVER, &self.dir.join("unbound"), &o)
    }

    /// fwknopd in the server namespace; returns the daemon and the (Rijndael, HMAC) keys.
    pub(crate) fn start_fwknopd(&self) -> Result<(Process, (String, String))> {
        let fdir = self.dir.join("fwknop");
        std::fs::create_dir_all(&fdir)?;
        let b64 = data_encoding::BASE64;
        let (k, h) = (b64.encode(&random_bytes(32)), b64.encode(&random_bytes(64)));
        let conf = fdir.join("fwknopd.conf");
        let access = fdir.join("access.conf");
        std::fs::write(&conf, format!("PCAP_INTF eth0;\nFWKNOP_RUN_DIR {};\n", fdir.display()))?;
        std::fs::write(
            &access,
            format!(
                "SOURCE ANY\nKEY_BASE64 {k}\nHMAC_KEY_BASE64 {h}\n\
                 CMD_CYCLE_OPEN /usr/sbin/iptables -I KB -s $IP -p tcp --dport 22 -j ACCEPT\n\
                 CMD_CYCLE_CLOSE /usr/sbin/iptables -D KB -s $IP -p tcp --dport 22 -j ACCEPT\n\
                 CMD_CYCLE_TIMER 30\n"
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        for p in [&conf, &access] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600))?;
        }
        std::fs::write(fdir.join("fwknoprc"), "")?;
        std::fs::set_permissions(fdir.join("fwknoprc"), std::fs::Permissions::from_mode(0o600))?;
        let mut d = spawn(
            self.srv(),
            &[
                "fwknopd",
                "-f",
                "-c",
                conf.to_str().unwrap(),
                "-a",
                access.to_str().unwrap(),
                "-d",
                fdir.join("digest.cache").to_str().unwrap(),
                "-p",
                fdir.join("fwknopd.pid").to_str().unwrap(),
            ],
            &fdir.join("fwknopd.log"),
        )?;
        d.wait_ready(Duration::from_secs(20), |d| d.log_text().contains("main event loop"))?;
        Ok((d, (k, h)))
    }

    pub(crate) fn start_knockd(&self) -> Result<Process> {
        let kdir = self.dir.join("knockd");
        std::fs::create_dir_all(&kdir)?;
        let conf = kdir.join("knockd.conf");
        std::fs::write(
            &conf,
            format!(
                "[options]\n    Interface = eth0\n    LogFile = {d}/knockd.log\n\
                 [open]\n    sequence = {s}\n    seq_timeout = 5\n    tcpflags = syn\n\
                 start_command = /usr/sbin/iptables -I KB -s %IP% -p tcp --dport 22 -j ACCEPT\n    cmd_timeout = 30\n\
                 stop_command = /usr/sbin/iptables -D KB -s %IP% -p tcp --dport 22 -j ACCEPT\n",
                d = kdir.display(),
                s = KNOCKD_PORTS.map(|p| p.to_string()).join(",")
            ),
        )?;
        let mut d = spawn(
            self.srv(),
            &["knockd", "-c", conf.to_str().unwrap(), "-i", "eth0", "-p", kdir.join("knockd.pid").to_str().unwrap()],
            &kdir.join("stdout.log"),
        )?;
        let log = kdir.join("knockd.log");
        d.wait_ready(Duration::from_secs(20), |_| {
            std::fs::read_to_string(&log).unwrap_or_default().contains("listening on")
        })?;
        Ok(d)
    }
}

//! knotd serving the lab zone on the lab server's port 53: the reference server of
//! the DNS-rate benchmark, and the "other nameserver" of passive-mode tests.

use std::path::Path;
use std::time::Duration;

use super::config::{ZONE, write_zone};
use super::dig::Dig;
use super::process::Process;
use super::{Netns, SERVER_V4};

/// Start knotd in `ns` (the lab server) with its files under `dir/knot`, and wait
/// (up to 20 s) until it answers for the zone. Stopped (SIGTERM, then SIGKILL) on drop.
pub fn start(ns: &Netns, dir: &Path) -> anyhow::Result<Process> {
    let kdir = dir.join("knot");
    std::fs::create_dir_all(&kdir)?;
    let zone = write_zone(&kdir)?;
    let conf = kdir.join("knot.conf");
    std::fs::write(
        &conf,
        format!(
            "server:\n    rundir: \"{k}\"\n    listen: {SERVER_V4}@53\n    user: root:root\n\
             database:\n    storage: \"{k}\"\n\
             log:\n  - target: stderr\n    any: warning\n\
             zone:\n  - domain: {ZONE}\n    file: \"{z}\"\n    storage: \"{k}\"\n\
             \x20   journal-content: none\n    zonefile-sync: -1\n",
            k = kdir.display(),
            z = zone.display(),
        ),
    )?;
    let conf = conf.to_str().ok_or_else(|| anyhow::anyhow!("knot.conf path is not UTF-8"))?;
    let mut p = Process::spawn("knotd", ns.cmd("knotd").args(["-c", conf]), &kdir.join("knotd.log"))?
        .with_grace(Duration::from_secs(3));
    let (at, name) = (format!("@{SERVER_V4}"), format!("ns1.{ZONE}"));
    p.wait_ready(Duration::from_secs(20), |_| {
        Dig::run(ns, &["+norec", "+time=1", "+tries=1", &at, &name]).is_ok_and(|d| d.status == "NOERROR")
    })?;
    Ok(p)
}

//! A throwaway PostgreSQL cluster (Debian's `postgresql` package): `initdb` in a
//! fresh directory owned by the `postgres` user, `pg_ctl start` inside a lab
//! namespace (listening on one of its addresses) or in the root namespace on a
//! Unix socket only. Trust authentication: nothing but the lab can reach it.
//! Dropping it stops the server (immediately) and removes the directory.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::Netns;

/// The cluster's port (each namespace has its own ports, the socket its own directory).
pub const PORT: u16 = 5432;

/// One running (or stopped) cluster.
#[derive(Debug)]
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    netns: Option<String>,
    listen: Option<IpAddr>,
}

impl Postgres {
    /// `initdb` and start a cluster. With `on = Some((ns, addr))` it runs in that
    /// namespace and listens on `addr`; with `None` it listens on a Unix socket in
    /// its own directory only. `name` tells concurrent clusters' directories apart.
    pub fn start(name: &str, on: Option<(&Netns, IpAddr)>) -> anyhow::Result<Postgres> {
        Postgres::start_with(name, on, false)
    }

    /// [`Postgres::start`]; with `tls`, the server has a certificate for its listen
    /// address signed by a throwaway CA ([`Postgres::ca_file`]) and refuses
    /// connections from the lab that are not TLS.
    pub fn start_with(name: &str, on: Option<(&Netns, IpAddr)>, tls: bool) -> anyhow::Result<Postgres> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!("nxknock-pg-{name}"));
        if dir.exists() {
            // A leftover of a killed run: stop whatever still runs there, then start clean.
            let _ = as_postgres(&bin.join("pg_ctl"))
                .args(["-D"])
                .arg(dir.join("data"))
                .args(["-m", "immediate", "stop"])
                .output();
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove leftover {}", dir.display()))?;
        }
        std::fs::create_dir(&dir).with_context(|| format!("create {}", dir.display()))?;
        let pg = Postgres { dir, bin, netns: on.map(|(ns, _)| ns.name().to_owned()), listen: on.map(|(_, a)| a) };
        let (uid, gid) = postgres_ids()?;
        std::os::unix::fs::chown(&pg.dir, Some(uid), Some(gid)).context("chown the cluster directory")?;
        let out = as_postgres(&pg.bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(pg.data())
            .output()
            .context("run initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // initdb trusts loopback only; the lab's own networks too (nothing else reaches them).
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(pg.data().join("pg_hba.conf"))
            .and_then(|mut f| {
                if tls {
                    f.write_all(b"hostnossl all all 198.18.0.0/15 reject\nhostnossl all all 2001:db8::/32 reject\n")?;
                }
                f.write_all(b"host all all 198.18.0.0/15 trust\nhost all all 2001:db8::/32 trust\n")
            })
            .context("extend pg_hba.conf")?;
        if tls {
            let addr = on.map(|(_, a)| a).context("TLS needs a listen address")?;
            pg.make_certificates(addr)?;
        }
        pg.start_again()?;
        Ok(pg)
    }

    /// The CA that signed the server's certificate (with TLS).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A CA and a server certificate for `addr` (openssl), and `ssl = on`.
    fn make_certificates(&self, addr: IpAddr) -> anyhow::Result<()> {
        let d = &self.dir;
        let run = |args: &[&str]| -> anyhow::Result<()> {
            let out = Command::new("openssl").args(args).current_dir(d).output().context("run openssl")?;
            if !out.status.success() {
                bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        };
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=nxknock lab CA"],
        ]
        .concat())?;
        run(&[&["req"][..], &ec, &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=nxknock lab db"]]
            .concat())?;
        std::fs::write(d.join("server.ext"), format!("subjectAltName=IP:{addr}\n"))?;
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        let (uid, gid) = postgres_ids()?;
        for f in ["server.key", "server.crt"] {
            std::os::unix::fs::chown(d.join(f), Some(uid), Some(gid))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d.join("server.key"), std::fs::Permissions::from_mode(0o600))?;
        use std::io::Write;
        std::fs::OpenOptions::new().append(true).open(self.data().join("postgresql.conf"))?.write_all(
            format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                d.join("server.crt").display(),
                d.join("server.key").display()
            )
            .as_bytes(),
        )?;
        Ok(())
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The server's log.
    /// The postmaster's process id (its backends are its children), if running.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The socket directory (for clients in the root namespace).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// A URL that reaches the `postgres` database: over TCP at the listen address,
    /// or over the Unix socket.
    pub fn url(&self) -> String {
        match self.listen {
            Some(IpAddr::V6(a)) => format!("postgres://postgres@[{a}]:{PORT}/postgres"),
            Some(a) => format!("postgres://postgres@{a}:{PORT}/postgres"),
            None => {
                let enc = self.dir.display().to_string().replace('/', "%2F");
                format!("postgres://postgres@{enc}:{PORT}/postgres")
            }
        }
    }

    /// Start the (stopped) server again, waiting until it accepts connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let listen = self.listen.map(|a| a.to_string()).unwrap_or_default();
        let opts = format!(
            "-c listen_addresses='{listen}' -c port={PORT} -c unix_socket_directories='{}'",
            self.dir.display()
        );
        let pg_ctl = self.bin.join("pg_ctl");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"]).arg(&pg_ctl);
                c
            }
            None => as_postgres(&pg_ctl),
        };
        let out = cmd
            .args(["-w", "-t", "30", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.log())
            .args(["-o", &opts, "start"])
            .output()
            .context("run pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Stop the server (`fast`: sessions are cut, committed work is kept).
    pub fn stop(&self) -> anyhow::Result<()> {
        let out = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(self.data())
            .args(["-m", "fast", "stop"])
            .output()
            .context("run pg_ctl stop")?;
        if !out.status.success() {
            bail!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// Run SQL with `psql` as the superuser (for tests that look inside).
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "runuser", "-u", "postgres", "--"]).arg("psql");
                c
            }
            None => as_postgres(Path::new("psql")),
        };
        let host = self.listen.map(|a| a.to_string()).unwrap_or_else(|| self.dir.display().to_string());
        let out = cmd
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                &host,
                "-p",
                &PORT.to_string(),
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .output()
            .context("run psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin.join("pg_ctl"))
            .args(["-w", "-D"])
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `runuser -u postgres -- program`: initdb and the server refuse to run as root.
fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

/// The newest `/usr/lib/postgresql/N/bin`.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (/usr/lib/postgresql); run scripts/deps")?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p): &(u32, PathBuf)| p.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).context("no initdb under /usr/lib/postgresql/*/bin; run scripts/deps")
}

fn postgres_ids() -> anyhow::Result<(u32, u32)> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output().context("run id")?;
        if !out.status.success() {
            bail!("no postgres user (install the postgresql package: scripts/deps)");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

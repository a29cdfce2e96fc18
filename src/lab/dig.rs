//! Real `dig` inside a namespace, reduced to what the harness looks at.
//!
//! The tests, the demo and the readiness checks of the resolvers ask the
//! server exactly as an operator would, with the stock tool; this is the one
//! place that runs it and reads its answer.

use std::io;

use super::Netns;

/// The essentials of one `dig` answer.
#[derive(Debug, Clone)]
pub struct Dig {
    /// The RCODE (`NOERROR`, `NXDOMAIN`, …), or `NO-ANSWER` if none came.
    pub status: String,
    /// The authoritative-answer flag.
    pub aa: bool,
    /// Everything dig printed.
    pub text: String,
}

impl Dig {
    /// Runs `dig +time=2 +tries=2 args…` inside `ns` (later arguments win).
    pub fn run(ns: &Netns, args: &[&str]) -> io::Result<Dig> {
        let out = ns.cmd("dig").args(["+time=2", "+tries=2"]).args(args).output()?;
        Ok(Dig::parse(String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    fn parse(text: String) -> Dig {
        let status = text.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("NO-ANSWER").to_owned();
        let aa = text.lines().any(|l| {
            l.starts_with(";; flags:") && l.split(';').nth(2).is_some_and(|f| f.split_whitespace().any(|w| w == "aa"))
        });
        Dig { status, aa, text }
    }

    /// The header lines: status and flags (what the demo shows).
    pub fn header(&self) -> impl Iterator<Item = &str> {
        self.text.lines().filter(|l| l.contains("status:") || l.starts_with(";; flags"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_status_and_aa() {
        let d = Dig::parse(
            ";; ->>HEADER<<- opcode: QUERY, status: NXDOMAIN, id: 1\n\
             ;; flags: qr aa; QUERY: 1, ANSWER: 0, AUTHORITY: 1, ADDITIONAL: 1\n"
                .into(),
        );
        assert_eq!((d.status.as_str(), d.aa), ("NXDOMAIN", true));
        assert_eq!(d.header().count(), 2);
        let d = Dig::parse(";; flags: qr rd ra; QUERY: 1, ANSWER: 1\n".into());
        assert_eq!((d.status.as_str(), d.aa), ("NO-ANSWER", false));
        // "aa" only counts among the flags, not in the counts after them.
        let d = Dig::parse(";; flags: qr; QUERY: 1, aa: 0\n".into());
        assert!(!d.aa);
    }
}

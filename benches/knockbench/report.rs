//! What a run reports: the machine and versions, the sections' tables (each
//! section writes its own), the notes, the latency CDF plot (gnuplot), and
//! `BENCHMARKS.md` with `--write`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::exec::host_cmd;
use crate::{BIN, Bench, ROOT};

impl Bench {
    pub(crate) fn machine(&mut self) {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("?")
            .trim()
            .to_owned();
        let first = |s: String| s.lines().find(|l| !l.trim().is_empty()).unwrap_or("?").trim().to_owned();
        let mem = host_cmd(&["free", "-g"]);
        let mem = mem
            .lines()
            .find(|l| l.starts_with("Mem:"))
            .unwrap_or("?")
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_owned();
        let dnsperf = host_cmd(&["dnsperf", "-h"]).lines().find(|l| l.starts_with("Version")).unwrap_or("?").to_owned();
        let knockd = first(host_cmd(&["knockd", "--version"]));
        let rows = [
            ("CPU", format!("{} × {cpu}", host_cmd(&["nproc"]).trim())),
            ("memory", format!("{mem} GiB")),
            ("kernel", host_cmd(&["uname", "-r"]).trim().to_owned()),
            (
                "OS",
                std::fs::read_to_string("/etc/debian_version")
                    .map(|v| format!("Debian {}", v.trim()))
                    .unwrap_or_default(),
            ),
            ("nxknock", first(host_cmd(&[BIN, "--version"]))),
            ("rustc", first(host_cmd(&["rustc", "--version"]))),
            ("knotd", first(host_cmd(&["knotd", "--version"]))),
            ("dnsperf", dnsperf),
            ("unbound", first(host_cmd(&["unbound", "-V"]))),
            // (`fwknop --version` would write ~/.fwknoprc: ask dpkg instead.)
            (
                "fwknopd / fwknop",
                format!(
                    "{} / fwknop-client {}",
                    first(host_cmd(&["fwknopd", "--version"])),
                    host_cmd(&["dpkg-query", "-W", "-f=${Version}", "fwknop-client"]).trim()
                ),
            ),
            ("knockd", knockd),
        ];
        let mut s = String::from("### Machine and versions\n\n| | |\n|---|---|\n");
        for (k, v) in rows {
            let _ = writeln!(s, "| {k} | {} |", v.replace('|', "/"));
        }
        let _ = writeln!(
            s,
            "\nRun: `scripts/bench{}` at {} (mode: {}).\n",
            if self.opts.quick { " --quick" } else { "" },
            host_cmd(&["date", "-u", "+%Y-%m-%d %H:%M UTC"]).trim(),
            if self.opts.quick { "quick" } else { "full" }
        );
        eprint!("{s}");
        self.report.push_str(&s);
    }

    pub(crate) fn finish(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.opts.out)?;
        let png = self.plot()?;
        if let Some(p) = &png {
            let _ =
                writeln!(self.report, "\n![knock-to-open latency CDF]({})\n", p.file_name().unwrap().to_string_lossy());
        }
        let results = self.opts.out.join("results.md");
        std::fs::write(&results, &self.report)?;
        println!("\n{}", self.report);
        println!("knockbench: results in {}", results.display());
        if self.opts.write {
            let doc = Path::new(ROOT).join("BENCHMARKS.md");
            let text = std::fs::read_to_string(&doc).unwrap_or_default();
            let (begin, end) = ("<!-- results:begin -->", "<!-- results:end -->");
            let body = self.report.replace("](latency_cdf.png)", "](benches/latency_cdf.png)");
            let new = match (text.find(begin), text.find(end)) {
                (Some(a), Some(b)) if a < b => {
                    format!("{}{begin}\n{body}\n{end}{}", &text[..a], &text[b + end.len()..])
                }
                _ => format!("{text}\n{begin}\n{body}\n{end}\n"),
            };
            std::fs::write(&doc, new)?;
            if let Some(p) = &png {
                std::fs::copy(p, Path::new(ROOT).join("benches/latency_cdf.png"))?;
            }
            println!("knockbench: wrote BENCHMARKS.md and benches/latency_cdf.png");
        }
        Ok(())
    }

    /// Latency CDF with gnuplot (pngcairo); None if there is nothing to plot or no gnuplot.
    pub(crate) fn plot(&self) -> Result<Option<PathBuf>> {
        if self.cdf.values().all(|(v, _)| v.is_empty()) {
            return Ok(None);
        }
        let mut script = String::from(
            "set terminal pngcairo size 1100,650 font ',11'\nset output 'latency_cdf.png'\n\
             set title 'Knock-to-open latency (knock packet leaves the client → TCP connect succeeds); curves end at the fraction that opened'\n\
             set xlabel 'milliseconds (log scale)'\nset ylabel 'fraction of knocks'\nset logscale x\n\
             set key bottom right\nset grid\nset yrange [0:1]\n",
        );
        let mut plots = Vec::new();
        for (i, (label, (v, trials))) in self.cdf.iter().enumerate() {
            if v.is_empty() {
                continue;
            }
            let mut s = v.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let f = format!("cdf-{i}.dat");
            // Fractions of all trials: knocks that never opened keep the curve below 1.
            let mut data = format!("{} 0\n", s[0]);
            for (j, x) in s.iter().enumerate() {
                let _ = writeln!(data, "{x} {}", (j + 1) as f64 / (*trials).max(1) as f64);
            }
            std::fs::write(self.opts.out.join(&f), data)?;
            plots.push(format!("'{f}' using 1:2 with steps lw 2 title '{}'", label.replace('\'', "")));
        }
        let _ = writeln!(script, "plot {}", plots.join(", \\\n     "));
        std::fs::write(self.opts.out.join("latency_cdf.gp"), &script)?;
        let st = Command::new("gnuplot").arg("latency_cdf.gp").current_dir(&self.opts.out).status();
        match st {
            Ok(s) if s.success() => Ok(Some(self.opts.out.join("latency_cdf.png"))),
            _ => {
                eprintln!("knockbench: gnuplot failed or missing; no plot");
                Ok(None)
            }
        }
    }
}

pub(crate) fn fmt_k(q: f64) -> String {
    if q >= 1000.0 { format!("{:.1}k", q / 1000.0) } else { format!("{q:.0}") }
}

pub(crate) fn fmt_ms(ms: f64) -> String {
    if ms == 0.0 {
        "–".into()
    } else if ms < 10.0 {
        format!("{ms:.2} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

pub(crate) fn fmt_dur(d: Duration) -> String {
    if d.as_secs_f64() >= 1.0 {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.0} ms", d.as_secs_f64() * 1e3)
    }
}

pub(crate) fn fmt_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1000 && n % 1000 == 0 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

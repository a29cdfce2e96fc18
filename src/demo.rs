//! `nxknock demo`: the whole story in throwaway namespaces.
pub fn run() -> anyhow::Result<()> {
    anyhow::bail!("demo: not yet built")
}

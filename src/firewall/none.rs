//! The `none` backend: logs what a real backend would do and touches nothing.
//!
//! For trying nxknock on a machine where it must not change the firewall
//! (a laptop, a CI runner without privileges), and for tests of everything
//! upstream of the doors.

use super::{Door, DoorBackend, FirewallError, Guarded, OpenDoor};

/// Opens no doors; every call succeeds after an `info!` line.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoneBackend;

impl DoorBackend for NoneBackend {
    fn name(&self) -> &'static str {
        "none"
    }

    fn install_guard(&self, services: &[Guarded]) -> Result<(), FirewallError> {
        tracing::info!(?services, "backend none: would install the guard");
        Ok(())
    }

    /// Still validates the door, so a bad door fails here as it would with a
    /// real backend instead of only in production.
    fn open(&self, door: &Door) -> Result<(), FirewallError> {
        let (addr, len) = door.checked()?;
        tracing::info!("backend none: would open {addr}/{len} {}/{} for {:?}", door.proto, door.port, door.open_for);
        Ok(())
    }

    fn close(&self, door: &Door) -> Result<(), FirewallError> {
        let (addr, len) = door.network()?;
        tracing::info!("backend none: would close {addr}/{len} {}/{}", door.proto, door.port);
        Ok(())
    }

    /// Nothing is ever open.
    fn list(&self) -> Result<Vec<OpenDoor>, FirewallError> {
        Ok(Vec::new())
    }

    fn uninstall(&self) -> Result<(), FirewallError> {
        tracing::info!("backend none: nothing to uninstall");
        Ok(())
    }
}

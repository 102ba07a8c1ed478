//! Test-only fault injection: a kup built with the cargo feature `fault-injection` (the
//! `kup-faults` binary that `make build` puts next to `kup` for the guest bench and the host tests)
//! fails on purpose at the point `KUP_TEST_FAULT` names. The release `kup` has none of this: there
//! [`at`] is an empty inline function and the variable means nothing.
//!
//! Points: `restore` (kup resume's restore fails before CRIU starts), `health-check` (kup
//! resume's health check fails), `kexec-load` (`kexec -s -l` refuses
//! the kernel), `kexec-exec` (`kexec -e` returns instead of switching), `update-record` (saving the
//! update record fails). `KUP_TEST_FAULT` names one point or several, comma-separated.

use crate::error::Result;

#[cfg(feature = "fault-injection")]
pub fn at(point: &str) -> Result<()> {
    match std::env::var("KUP_TEST_FAULT") {
        Ok(f) if f.split(',').any(|p| p == point) => crate::error::fail(format!("{point}: failed on purpose (fault injection, KUP_TEST_FAULT={point})")),
        _ => Ok(()),
    }
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn at(_point: &str) -> Result<()> {
    Ok(())
}

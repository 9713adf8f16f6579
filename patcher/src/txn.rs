//! The write transaction inside the pause: [`paused`] runs a step with every vCPU paused,
//! [`apply`] verifies the bytes it overwrites, writes, and rolls back what it wrote on failure.

use std::time::{Duration, Instant};

use introspect::PhysMemory;

use crate::engine::PatchError;
use crate::guest::GuestControl;
use crate::site;

/// One planned write with the bytes expected there before it.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    /// Guest-physical address.
    pub(crate) pa: u64,
    /// What must be there now (checked before anything is written); `None` = anything.
    pub(crate) expect: Option<Vec<u8>>,
    /// What was there, read by [`apply`] (restored on rollback).
    pub(crate) old: Vec<u8>,
    /// The bytes to write.
    pub(crate) new: Vec<u8>,
    /// What it is, for errors.
    pub(crate) what: String,
}

pub(crate) fn read(mem: &dyn PhysMemory, pa: u64, len: usize) -> Result<Vec<u8>, PatchError> {
    let mut b = vec![0u8; len];
    mem.read_phys(pa, &mut b)
        .map_err(|e| PatchError::Memory(e.to_string()))?;
    Ok(b)
}

/// Runs `f` with all vCPUs paused (unless the caller had them paused already).
pub(crate) fn paused<T>(
    ctl: &mut dyn GuestControl,
    f: impl FnOnce(&mut dyn GuestControl) -> Result<T, PatchError>,
) -> Result<(T, Duration), PatchError> {
    let was = ctl.is_paused();
    let t = Instant::now();
    if !was {
        ctl.pause()?;
    }
    let r = f(ctl);
    let resumed = if was { Ok(()) } else { ctl.resume() };
    let d = t.elapsed();
    let v = r?;
    resumed?;
    Ok((v, d))
}

/// Verifies then applies `writes` in order; on failure restores what was written.
pub(crate) fn apply(ctl: &mut dyn GuestControl, writes: &mut [Write]) -> Result<(), PatchError> {
    for w in writes.iter_mut() {
        if let Some(exp) = &w.expect {
            let cur = read(ctl.memory(), w.pa, exp.len())?;
            if &cur != exp {
                return Err(PatchError::Changed(format!(
                    "{} at {:#x}: expected {}, found {}",
                    w.what,
                    w.pa,
                    site::hex(&exp[..exp.len().min(16)]),
                    site::hex(&cur[..cur.len().min(16)])
                )));
            }
        }
        w.old = read(ctl.memory(), w.pa, w.new.len())?;
    }
    let batch: Vec<(u64, &[u8])> = writes.iter().map(|w| (w.pa, w.new.as_slice())).collect();
    if let Err(e) = ctl.write_phys_batch(&batch) {
        // Part of the batch may have landed (some writes possibly in part): restore,
        // newest first, every write whose bytes are no longer the old ones.
        for w in writes.iter().rev() {
            if read(ctl.memory(), w.pa, w.old.len()).ok().as_ref() != Some(&w.old) {
                let _ = ctl.write_phys(w.pa, &w.old);
            }
        }
        return Err(e.into());
    }
    Ok(())
}

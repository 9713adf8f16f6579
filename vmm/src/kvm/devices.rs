//! Legacy devices on the port-I/O bus: COM1 (vm-superio 8250, IRQ 4 through an irqfd) and the
//! i8042 reset line. PIT and PIC/IOAPIC are in-kernel (KVM_CREATE_PIT2, KVM_CREATE_IRQCHIP).
//! Unknown ports read as all-ones (CMOS as 0) and ignore writes; MMIO reads return 0xff.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use tracing::trace;
use vm_superio::serial::NoEvents;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::layout::{COM1_PORT, I8042_PORT};
use thiserror::Error;

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialOut {
    /// The VMM's stdout; stdin feeds the guest's serial input.
    #[default]
    Stdio,
    /// A file (created or truncated). Input only through [`crate::kvm::Vm::serial_input`].
    File(PathBuf),
    /// Discarded.
    Null,
}

impl std::str::FromStr for SerialOut {
    type Err = std::convert::Infallible;
    /// `stdio`, `null`/`none`, or a file path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "stdio" => SerialOut::Stdio,
            "null" | "none" => SerialOut::Null,
            p => SerialOut::File(PathBuf::from(p)),
        })
    }
}

/// Errors creating the devices.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// Serial output could not be opened.
    #[error("serial output {path}: {source}")]
    Serial {
        /// Path given.
        path: PathBuf,
        /// I/O error.
        #[source]
        source: io::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// An [`EventFd`] as a vm-superio interrupt/reset trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A writer that flushes after every write (so partial lines such as shell prompts show).
struct Flushing<W: Write>(W);

impl<W: Write> Write for Flushing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.0.write(buf)?;
        self.0.flush()?;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

type SerialDev = Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>;

/// The port-I/O devices.
pub struct Devices {
    serial: SerialDev,
    i8042: I8042Device<EventFdTrigger>,
    reset_evt: EventFd,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").finish_non_exhaustive()
    }
}

fn evt() -> Result<EventFd, DeviceError> {
    EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)
}

impl Devices {
    /// Creates the devices; returns them and the eventfd to register as COM1's irqfd.
    pub fn new(out: &SerialOut) -> Result<(Devices, EventFd), DeviceError> {
        let writer: Box<dyn Write + Send> = match out {
            SerialOut::Stdio => Box::new(Flushing(io::stdout())),
            SerialOut::File(p) => {
                Box::new(File::create(p).map_err(|source| DeviceError::Serial {
                    path: p.clone(),
                    source,
                })?)
            }
            SerialOut::Null => Box::new(io::sink()),
        };
        let irq = evt()?;
        let irq_clone = irq.try_clone().map_err(DeviceError::EventFd)?;
        let reset_evt = evt()?;
        let reset_clone = reset_evt.try_clone().map_err(DeviceError::EventFd)?;
        Ok((
            Devices {
                serial: Serial::new(EventFdTrigger(irq), writer),
                i8042: I8042Device::new(EventFdTrigger(reset_clone)),
                reset_evt,
            },
            irq_clone,
        ))
    }

    /// Handles an `in` from `port`.
    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        let fill = match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => self.serial.read((p - COM1_PORT) as u8),
            p if (I8042_PORT..=I8042_PORT + 4).contains(&p) => {
                self.i8042.read((p - I8042_PORT) as u8)
            }
            0x70 | 0x71 => 0,
            _ => {
                trace!(port, "unhandled port read");
                0xff
            }
        };
        data.fill(fill);
    }

    /// Handles an `out` to `port`. Returns true when the guest asked for a CPU reset.
    pub fn io_out(&mut self, port: u16, data: &[u8]) -> bool {
        let Some(&value) = data.first() else {
            return false;
        };
        match port {
            p if (COM1_PORT..COM1_PORT + 8).contains(&p) => {
                if let Err(e) = self.serial.write((p - COM1_PORT) as u8, value) {
                    trace!("serial write: {e}");
                }
                false
            }
            p if (I8042_PORT..=I8042_PORT + 4).contains(&p) => {
                if let Err(e) = self.i8042.write((p - I8042_PORT) as u8, value) {
                    trace!("i8042 write: {e}");
                }
                self.reset_evt.read().is_ok()
            }
            _ => {
                trace!(port, value, "unhandled port write");
                false
            }
        }
    }

    /// Queues bytes for the guest to read from COM1; returns how many fit in the FIFO.
    pub fn serial_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_and_unknown_ports() {
        let (mut d, _irq) = Devices::new(&SerialOut::Null).unwrap();
        let mut b = [0u8; 1];
        d.io_in(0x1234, &mut b);
        assert_eq!(b, [0xff]);
        assert!(!d.io_out(0x64, &[0x20]));
        assert!(!d.io_out(0x3f8, b"x"));
        assert!(d.io_out(0x64, &[0xfe]));
        assert!(!d.io_out(0x64, &[]));
    }
}

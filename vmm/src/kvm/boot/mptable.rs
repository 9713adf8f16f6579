//! Intel MultiProcessor Specification 1.4 table (after Firecracker's mptable.rs): one processor
//! entry per vCPU (APIC ids 0..N-1), an ISA bus, one I/O APIC, 24 interrupt-source entries and
//! the LINT0 (ExtINT) / LINT1 (NMI) local interrupt entries. Placed in the EBDA.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::kvm::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const IRQ_COUNT: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer structure followed by the MP configuration table, for a table
/// placed at `base`.
pub fn build_mptable(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus.wrapping_add(1);
    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        entries.push(MP_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for irq in 0..IRQ_COUNT {
        // type, irqtype, irqflag (u16), srcbus, srcbusirq, dstapic, dstirq
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = vcpus as u16 + 1 + 1 + IRQ_COUNT as u16 + 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec 1.4
    table.push(0); // checksum
    table.extend_from_slice(b"HVPATCH ");
    table.extend_from_slice(b"HVPATCH-VMM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // oem table
    table.extend_from_slice(&0u16.to_le_bytes()); // oem size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16 + table.len());
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    mpf.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    mpf[10] = checksum(&mpf);
    mpf.extend_from_slice(&table);
    mpf
}

/// Writes the MP table for `vcpus` vCPUs into the EBDA.
pub fn write_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), BootError> {
    let t = build_mptable(EBDA_START, vcpus);
    if EBDA_START + t.len() as u64 > 0xa0000 {
        return Err(BootError::DoesNotFit(format!(
            "MP table for {vcpus} vCPUs does not fit the EBDA"
        )));
    }
    mem.write_slice(&t, GuestAddress(EBDA_START))
        .map_err(|e| BootError::GuestMemory(format!("MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build_mptable(EBDA_START, 2);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u16::from_le_bytes([table[34], table[35]]), 2 + 2 + 24 + 2);
        // 1024-byte EBDA holds 254 vCPUs? It must at least hold a good number.
        assert!(build_mptable(EBDA_START, 32).len() <= 0x400);
    }
}

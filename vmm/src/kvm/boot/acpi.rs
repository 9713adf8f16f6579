//! Minimal ACPI tables: RSDP, XSDT, FADT (hardware-reduced, reset register = i8042 0xfe),
//! empty DSDT and MADT (one local APIC per vCPU, the I/O APIC, LINT1 NMI). Debian's cloud
//! kernels are built without `CONFIG_X86_MPPARSE`, so they enumerate CPUs only from the MADT;
//! the MP table stays for kernels that parse it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::BootError;
use crate::kvm::layout::{APIC_ADDR, IOAPIC_ADDR};

/// Where the RSDP goes (the BIOS area Linux scans; reserved in the e820 map).
pub const RSDP_ADDR: u64 = 0xe0000;
const XSDT_ADDR: u64 = RSDP_ADDR + 0x40;
const FADT_ADDR: u64 = RSDP_ADDR + 0x80;
const DSDT_ADDR: u64 = RSDP_ADDR + 0x1c0;
const MADT_ADDR: u64 = RSDP_ADDR + 0x200;
const END: u64 = 0xf0000;

const OEM_ID: &[u8; 6] = b"HVPTCH";
const OEM_TABLE_ID: &[u8; 8] = b"HVPATCH ";

const FADT_LEN: usize = 276;
const FADT_F_RESET_REG_SUP: u32 = 1 << 10;
const FADT_F_HW_REDUCED_ACPI: u32 = 1 << 20;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;
const MADT_PCAT_COMPAT: u32 = 1;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// A table: header (checksum fixed up by [`finish`]) followed by `body`.
fn table(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = (36 + body.len()) as u32;
    let mut t = Vec::with_capacity(len as usize);
    t.extend_from_slice(sig);
    t.extend_from_slice(&len.to_le_bytes());
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(b"HVPT");
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

fn rsdp() -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(OEM_ID);
    r.push(2);
    r.extend_from_slice(&0u32.to_le_bytes());
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&XSDT_ADDR.to_le_bytes());
    r.push(0);
    r.extend_from_slice(&[0; 3]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

fn fadt() -> Vec<u8> {
    let mut b = vec![0u8; FADT_LEN - 36];
    let mut put =
        |off: usize, bytes: &[u8]| b[off - 36..off - 36 + bytes.len()].copy_from_slice(bytes);
    put(40, &(DSDT_ADDR as u32).to_le_bytes());
    put(
        109,
        &(IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED | IAPC_NO_CMOS_RTC).to_le_bytes(),
    );
    put(
        112,
        &(FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP).to_le_bytes(),
    );
    // RESET_REG: system I/O, 8 bits, byte access, port 0x64; RESET_VALUE 0xfe.
    put(116, &[1, 8, 0, 1]);
    put(120, &0x64u64.to_le_bytes());
    put(128, &[0xfe]);
    put(131, &[5]); // FADT minor version (6.5)
    put(140, &DSDT_ADDR.to_le_bytes());
    put(268, b"KVMKVMKV");
    table(b"FACP", 6, &b)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&APIC_ADDR.to_le_bytes());
    b.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for cpu in 0..vcpus {
        b.extend_from_slice(&[0, 8, cpu, cpu]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
    }
    b.extend_from_slice(&[1, 12, vcpus.wrapping_add(1), 0]);
    b.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes()); // GSI base
                                              // Local APIC NMI: all processors, flags 0, LINT1.
    b.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    table(b"APIC", 5, &b)
}

/// Builds all tables as `(address, bytes)`.
pub fn build_acpi(vcpus: u8) -> Vec<(u64, Vec<u8>)> {
    let mut xsdt_body = Vec::new();
    xsdt_body.extend_from_slice(&FADT_ADDR.to_le_bytes());
    xsdt_body.extend_from_slice(&MADT_ADDR.to_le_bytes());
    vec![
        (RSDP_ADDR, rsdp()),
        (XSDT_ADDR, table(b"XSDT", 1, &xsdt_body)),
        (FADT_ADDR, fadt()),
        (DSDT_ADDR, table(b"DSDT", 2, &[])),
        (MADT_ADDR, madt(vcpus)),
    ]
}

/// Writes the ACPI tables for `vcpus` vCPUs; returns the RSDP address.
pub fn write_acpi(mem: &GuestMemoryMmap, vcpus: u8) -> Result<u64, BootError> {
    for (addr, bytes) in build_acpi(vcpus) {
        if addr + bytes.len() as u64 > END {
            return Err(BootError::DoesNotFit(format!(
                "ACPI tables for {vcpus} vCPUs do not fit"
            )));
        }
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(|e| BootError::GuestMemory(format!("ACPI tables: {e}")))?;
    }
    Ok(RSDP_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_are_consistent() {
        let t = build_acpi(4);
        let rsdp = &t[0].1;
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        for (addr, bytes) in &t[1..] {
            assert_eq!(sum(bytes), 0, "checksum of table at {addr:#x}");
            let len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, bytes.len());
        }
        // Tables do not overlap.
        for w in t.windows(2) {
            assert!(w[0].0 + w[0].1.len() as u64 <= w[1].0);
        }
        assert_eq!(t[2].1.len(), FADT_LEN);
        let madt = &t[4].1;
        assert_eq!(madt.len(), 36 + 8 + 4 * 8 + 12 + 6);
        // 32 vCPUs fit.
        let big = build_acpi(32);
        let last = big.last().unwrap();
        assert!(last.0 + last.1.len() as u64 <= END);
    }
}

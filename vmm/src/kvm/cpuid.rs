//! Per-vCPU CPUID, normalised from `KVM_GET_SUPPORTED_CPUID`: APIC id and logical count
//! (leaf 1), x2APIC topology (leaves 0xb/0x1f, one thread per core, one package), cache
//! topology (leaf 4), hypervisor bit, KVM signature leaves.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::Kvm;

use super::error::VmError;

const KVM_SIGNATURE: [u32; 3] = [
    u32::from_le_bytes(*b"KVMK"),
    u32::from_le_bytes(*b"VMKV"),
    u32::from_le_bytes(*b"M\0\0\0"),
];
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// CPUID leaves KVM can give its guests.
pub fn supported_cpuid(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, VmError> {
    let c = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VmError::kvm("KVM_GET_SUPPORTED_CPUID"))?;
    Ok(c.as_slice().to_vec())
}

fn bits_for(n: u32) -> u32 {
    // ceil(log2(n)), 0 for n <= 1
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID of vCPU `apic_id` in a VM of `vcpus` vCPUs.
pub fn vcpu_cpuid(base: &[kvm_cpuid_entry2], apic_id: u8, vcpus: u8) -> Vec<kvm_cpuid_entry2> {
    let n = u32::from(vcpus.max(1));
    let id = u32::from(apic_id);
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(base.len() + 4);
    let mut saw_topology = [false, false];
    for e in base {
        let mut e = *e;
        match e.function {
            1 => {
                e.ebx = (id << 24) | (n << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if n > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                let level = (e.eax >> 5) & 7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((n - 1) & 0x3f) << 26);
            }
            0xb | 0x1f => {
                // Rebuilt below, once per leaf.
                let i = usize::from(e.function == 0x1f);
                if !saw_topology[i] {
                    saw_topology[i] = true;
                    out.extend(topology_leaf(e.function, id, n));
                }
                continue;
            }
            0x4000_0000 => {
                e.eax = e.eax.max(0x4000_0001);
                e.ebx = KVM_SIGNATURE[0];
                e.ecx = KVM_SIGNATURE[1];
                e.edx = KVM_SIGNATURE[2];
            }
            _ => {}
        }
        out.push(e);
    }
    if !out.iter().any(|e| e.function == 0x4000_0000) {
        out.push(kvm_cpuid_entry2 {
            function: 0x4000_0000,
            eax: 0x4000_0001,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        });
    }
    if !out.iter().any(|e| e.function == 0x4000_0001) {
        out.push(kvm_cpuid_entry2 {
            function: 0x4000_0001,
            ..Default::default()
        });
    }
    out
}

fn topology_leaf(function: u32, id: u32, n: u32) -> Vec<kvm_cpuid_entry2> {
    let e = |index: u32, eax: u32, ebx: u32, level_type: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | index,
        edx: id,
        ..Default::default()
    };
    vec![
        // SMT level: one thread per core.
        e(0, 0, 1, 1),
        // Core level: all vCPUs in one package.
        e(1, bits_for(n), n, 2),
        // Invalid level terminates the enumeration.
        e(2, 0, 0, 0),
    ]
}

/// Wraps entries for `KVM_SET_CPUID2`.
pub fn to_kvm(entries: &[kvm_cpuid_entry2]) -> Result<CpuId, VmError> {
    CpuId::from_entries(entries).map_err(|e| VmError::Host(format!("CPUID table: {e:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_leaves() {
        let base = vec![
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xff00_0000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                eax: 0x63,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let c = vcpu_cpuid(&base, 3, 4);
        let l1 = c.iter().find(|e| e.function == 1).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let l4 = c.iter().find(|e| e.function == 4).unwrap();
        assert_eq!((l4.eax >> 26) + 1, 4);
        assert_eq!((l4.eax >> 14) & 0xfff, 3); // L3 shared by all
        let b: Vec<_> = c.iter().filter(|e| e.function == 0xb).collect();
        assert_eq!(b.len(), 3);
        assert_eq!((b[1].eax, b[1].ebx, b[1].edx), (2, 4, 3));
        let sig = c.iter().find(|e| e.function == 0x4000_0000).unwrap();
        let mut s = Vec::new();
        for r in [sig.ebx, sig.ecx, sig.edx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s[..9], b"KVMKVMKVM");
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
    }
}

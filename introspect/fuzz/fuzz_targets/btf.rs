//! Fuzz the BTF parser and its queries on arbitrary blobs.
#![no_main]

use introspect::btf::Btf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(b) = Btf::parse(data.to_vec()) else {
        return;
    };
    for s in ["task_struct", "pt_regs", "a", ""] {
        let _ = b.struct_size(s);
        for p in ["pid", "thread.sp", "a.b.c", "name.release", ""] {
            let _ = b.member(s, p);
        }
    }
    let _ = b.enum_value("MOD_TEXT");
    for id in 0..(b.type_count() as u32).min(4096) + 2 {
        let _ = b.type_size(id);
        let _ = b.resolve(id);
        let _ = b.type_name(id);
    }
});

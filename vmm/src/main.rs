//! The `hvpatch` command.

fn main() {
    println!("hvpatch");
}

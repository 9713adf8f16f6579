//! `hvpatch-images`: fetch and build guest images.

fn main() {}

//! Guest images for hvpatch's tests and demo.

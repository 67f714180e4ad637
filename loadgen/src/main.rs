//! psync-loadgen (being written).
fn main() {}

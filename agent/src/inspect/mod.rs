//! The "inspect" stage: read a (usually stripped) Go binary and find exactly
//! where to place probes, or refuse and say why. (Issue 3: being built.)

//! Target descriptions (ISA features, vector widths, cache sizes) and host detection. Empty
//! until the Cranelift backend issue.

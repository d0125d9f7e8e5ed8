//! Tests of the block device (filled below).

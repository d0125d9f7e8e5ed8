//! `twinbox bench` (owned by the bench work; placeholder until it lands).
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub fn main(_args: BenchArgs) -> anyhow::Result<i32> {
    anyhow::bail!("`twinbox bench` is not built yet")
}

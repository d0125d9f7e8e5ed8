//! `twinbox doctor` (owned by the foundation work; placeholder until it lands).
use clap::Args;

#[derive(Args, Debug)]
pub struct DoctorArgs {}

pub fn main(_args: DoctorArgs) -> anyhow::Result<i32> {
    anyhow::bail!("`twinbox doctor` is not built yet")
}

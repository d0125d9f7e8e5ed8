//! `twinbox vm ...` (owned by the VMM work; placeholder until it lands).
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum VmCommand {}

pub fn main(command: VmCommand, _spawn_ns: u64) -> anyhow::Result<i32> {
    match command {}
}

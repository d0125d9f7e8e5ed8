//! `twinbox ctr ...` (owned by the container work; placeholder until it lands).
use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum CtrCommand {}

pub fn main(command: CtrCommand, _spawn_ns: u64) -> anyhow::Result<i32> {
    match command {}
}

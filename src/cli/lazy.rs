//! Subcommands whose arguments clap builds only when that subcommand is the one run.
//!
//! clap's derive builds every subcommand's `Command` with all its arguments before it
//! parses anything: for `twinbox ctr run` that is also `vm run`'s, `bench`'s, `image`'s...
//! each argument a few heap allocations, ~15 page faults of heap growth per start of the
//! binary (~15 µs each on a PVM host). [`Lazy`] wraps a subcommand's type so its arguments
//! are added by [`clap::Command::defer`], which clap runs when it builds that subcommand
//! alone: to parse it, or to print its help. `twinbox --help` still lists every
//! subcommand: its name and description are set eagerly, by the enum that holds it.

use clap::{ArgMatches, Args, Command, Error, FromArgMatches, Subcommand};

/// A subcommand (`T: Args`) or a group of them (`T: Subcommand`) built on demand.
#[derive(Debug)]
pub struct Lazy<T>(pub T);

impl<T: FromArgMatches> FromArgMatches for Lazy<T> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, Error> {
        T::from_arg_matches(matches).map(Lazy)
    }

    fn from_arg_matches_mut(matches: &mut ArgMatches) -> Result<Self, Error> {
        T::from_arg_matches_mut(matches).map(Lazy)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), Error> {
        self.0.update_from_arg_matches(matches)
    }

    fn update_from_arg_matches_mut(&mut self, matches: &mut ArgMatches) -> Result<(), Error> {
        self.0.update_from_arg_matches_mut(matches)
    }
}

impl<T: Args> Args for Lazy<T> {
    fn group_id() -> Option<clap::Id> {
        T::group_id()
    }

    fn augment_args(command: Command) -> Command {
        command.defer(|command| keeping_about(command, T::augment_args))
    }

    fn augment_args_for_update(command: Command) -> Command {
        T::augment_args_for_update(command)
    }
}

impl<T: Subcommand> Subcommand for Lazy<T> {
    fn augment_subcommands(command: Command) -> Command {
        command.defer(|command| keeping_about(command, T::augment_subcommands))
    }

    fn augment_subcommands_for_update(command: Command) -> Command {
        T::augment_subcommands_for_update(command)
    }

    fn has_subcommand(name: &str) -> bool {
        T::has_subcommand(name)
    }
}

/// `augment(command)`, with the description the holding enum gave `command` kept. Built
/// eagerly, the enum's variant sets it after the arguments' type has set its own (a
/// struct's doc comment, "Options of ..."); deferred, the type comes second and would win.
fn keeping_about(command: Command, augment: fn(Command) -> Command) -> Command {
    let Some(about) = command.get_about().cloned() else {
        return augment(command);
    };
    let long_about = command.get_long_about().cloned();
    let command = augment(command).about(about);
    match long_about {
        Some(long_about) => command.long_about(long_about),
        None => command.long_about(None::<&'static str>),
    }
}

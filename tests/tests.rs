//! End-to-end tests of the `pycstore` binary: real interpreters importing
//! real packages from pycs that pycstore placed.

#[macro_use]
mod util;

mod cli;
mod flavors;
mod interpreters;
mod lifecycle;
mod link_modes;
mod stdlib;

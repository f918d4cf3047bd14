//! End-to-end tests of the `pycstore` binary: real interpreters importing
//! real packages from pycs that pycstore placed.

#[macro_use]
mod util;

mod cli;
mod concurrency;
mod config;
mod crash;
mod first_hour;
mod flavors;
mod fuse;
mod fuse_corpus;
mod gc;
mod hostile;
mod integrity;
mod interpreters;
mod lifecycle;
mod link_modes;
mod marshal;
mod pack;
mod prefix_attacks;
mod reads;
mod remote;
mod stdlib;
mod trust;
mod upgrade;
mod verify;

//! The protocol-agnostic engine.

pub(crate) mod coalesce;

//! The HTTP front end.

pub(crate) mod body;
pub(crate) mod future;

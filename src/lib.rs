//! kiln: the launcher library.

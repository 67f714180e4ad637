//! The peer side of psync: register with the server, punch the hole, prove the path.
//!
//! (Being written; see issue 5.)

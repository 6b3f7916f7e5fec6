//! ShCR gateway: the front door that authenticates clinicians, resolves their care system,
//! authorises and routes to its store (issue 5), and [`dev`], the whole platform on one machine.

pub mod dev;

//! ShCR gateway: the stateless front door. It authenticates clinicians and apps ([`auth`]),
//! resolves the care system from the path ([`routing`]), decides whether the caller may act
//! there ([`access`]), admits the request under the care system's limits ([`limits`]) and
//! proxies it with a signed identity assertion to that care system's store ([`proxy`]), telling
//! the store about the requests it refused ([`refusals`]);
//! [`server`] runs it as `shcr gateway` ([`config`]), and [`dev`] runs the whole platform on one
//! machine (`shcr dev`, with [`seed`] demo data); [`app`] serves the reference web app at `/app/`.

pub mod access;
pub mod app;
pub mod auth;
pub mod config;
pub mod dev;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod refusals;
pub mod routing;
pub mod seed;
pub mod server;

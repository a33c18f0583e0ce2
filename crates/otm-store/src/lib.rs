//! otm's storage backends: the registry, the coordinator and the state store, plus the
//! conformance suites every backend of those traits must pass.
//!
//! Callers pick a backend by URL through [`open`] and use it as `Arc<dyn Trait>`; nothing outside
//! this crate names a concrete backend type except tests.
//!
//! # Layout
//! - [`sqlite`]: [`SqliteRegistry`], the embedded [`otm_core::Registry`]: one SQLite file, one
//!   writer thread with group commit, a small pool of read-only connections.
//! - [`memory`]: [`MemoryCoordinator`], the in-process [`otm_core::Coordinator`].
//! - [`objstore`]: [`ObjectStateStore`], the [`otm_core::StateStore`] over any `object_store`
//!   backend (a local directory in this build).
//! - [`open`]: picks a backend from a URL and names the ones missing from this build.
//! - [`conformance`]: the shared test suites, one per trait.

pub mod conformance;
pub mod memory;
pub mod objstore;
pub mod open;
pub mod sqlite;

pub use memory::MemoryCoordinator;
pub use objstore::ObjectStateStore;
pub use open::{
    CoordinatorBackend, RegistryBackend, StateStoreBackend, open_coordinator, open_registry,
    open_state_store,
};
pub use sqlite::SqliteRegistry;

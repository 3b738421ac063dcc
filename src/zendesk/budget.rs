//! OWNER: zendesk helper. The request budget: to be written.

/// The request budget shared by everything that calls one Zendesk account.
pub struct Budget {}

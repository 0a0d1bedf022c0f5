//! `.difypkg` → Lambda zip (placeholder; see issue 4).

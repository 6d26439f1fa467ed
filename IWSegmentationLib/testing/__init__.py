"""Known answers for end-to-end checks (the phantom). Shipped with the extension only for its self-test."""

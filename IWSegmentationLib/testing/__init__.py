"""Known answers for end-to-end checks (the phantom, and its checkpoint written by a child). Shipped with the extension only for its self-test."""

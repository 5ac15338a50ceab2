"""Alert enrichment read on the host at the write: packages, web roots, requests, content."""

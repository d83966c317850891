"""HTTP: the JSON API, the pages, and the mapping of domain errors to problem+json."""

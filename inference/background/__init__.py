"""The asynchronous background model: tools and longer reasoning off the tick path (see ``README.md`` here)."""

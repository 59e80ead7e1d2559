"""Drop-in shims with other libraries' signatures."""

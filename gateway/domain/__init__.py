"""The registry's business rules over the store: accounts, apps, access, audit."""

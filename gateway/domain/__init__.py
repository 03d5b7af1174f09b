"""The business rules over the registry: the facade (facade.Domain) and its parts, access, audit."""

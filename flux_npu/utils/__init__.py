"""Small shared utilities (tables, versions)."""

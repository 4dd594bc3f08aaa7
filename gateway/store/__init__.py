"""PostgreSQL storage: migrations, the group-commit writer, one module per aggregate."""

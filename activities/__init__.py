"""Side effects of the workflows: database writes, provider calls, history rows."""

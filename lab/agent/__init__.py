"""Guest agents: one interface, one implementation per transport and shell."""

"""Plain nn.Module components of the world model; none of them knows about Lightning."""

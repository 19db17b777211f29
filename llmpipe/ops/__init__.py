"""Operations: the server stack (up/down), work pools and deployments."""

"""HTTP routes, one APIRouter per route group; `r2m.service.app` assembles them."""

"""HTTP routes, one APIRouter per route group; `r2m.service.api.app` assembles them."""

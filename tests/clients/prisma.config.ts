// Prisma's configuration for the client test: the schema only. The client
// talks to pgwarden through the Neon HTTP adapter, so no URL is needed here.
import { defineConfig } from 'prisma/config';

export default defineConfig({ schema: 'prisma/schema.prisma' });

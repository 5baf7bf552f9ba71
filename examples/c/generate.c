/*
 * Generates one image through libultrapixel with a progress callback, writes the PNG and
 * prints its seed; then starts a second generation and cancels it at its first step.
 *
 *   cargo build --release -p ultrapixel-capi
 *   cc -std=c11 -Icapi/include examples/c/generate.c -Ltarget/release -lultrapixel \
 *      -Wl,-rpath,"$PWD/target/release" -o upx-generate
 *   ./upx-generate MODEL_DIR BACKEND OUT.png PROMPT [SEED [WIDTH HEIGHT [STEPS_C STEPS_B]]]
 *
 * BACKEND is cuda, hostsim or cpu. The exit code is the last status (the CLI's exit codes).
 * capi/tests/c_example.rs builds and runs it on the tiny model.
 */
#include "ultrapixel.h"

#include <stdio.h>
#include <stdlib.h>

static const char *const STAGE_NAMES[] = {
    [UPX_STAGE_TEXT_ENCODER] = "text encoder",
    [UPX_STAGE_C_LOW_RES] = "stage C low-res",
    [UPX_STAGE_C_HIGH_RES] = "stage C",
    [UPX_STAGE_B] = "stage B",
    [UPX_STAGE_A] = "stage A",
};

static void print_progress(void *user_data, UpxStage stage, uint32_t step, uint32_t steps) {
    (void)user_data;
    if (steps == 0)
        fprintf(stderr, "%s\n", STAGE_NAMES[stage]);
    else
        fprintf(stderr, "%s: %u/%u\n", STAGE_NAMES[stage], (unsigned)step, (unsigned)steps);
}

/* Any thread may cancel; here the callback itself does, once the first step is done. */
static void cancel_after_first_step(void *pipeline, UpxStage stage, uint32_t step,
                                    uint32_t steps) {
    (void)steps;
    if (stage == UPX_STAGE_C_LOW_RES && step == 1)
        upx_cancel(pipeline);
}

static int fail(const char *what, UpxStatus status) {
    fprintf(stderr, "%s: %s\n", what, upx_last_error());
    return (int)status;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6 && argc != 8 && argc != 10) {
        fprintf(stderr,
                "usage: %s MODEL_DIR BACKEND OUT.png PROMPT [SEED [WIDTH HEIGHT [STEPS_C "
                "STEPS_B]]]\n(libultrapixel %s)\n",
                argv[0], upx_version());
        return 2;
    }
    UpxSettings settings;
    UpxStatus status = upx_settings_init(&settings, sizeof settings);
    if (status != UPX_STATUS_OK)
        return fail("settings", status);
    if (argc >= 6) {
        settings.use_seed = true;
        settings.seed = strtoull(argv[5], NULL, 10);
    }
    if (argc >= 8) {
        settings.width = (uint32_t)strtoul(argv[6], NULL, 10);
        settings.height = (uint32_t)strtoul(argv[7], NULL, 10);
    }
    if (argc >= 10) {
        settings.stage_c.steps = (uint32_t)strtoul(argv[8], NULL, 10);
        settings.stage_b.steps = (uint32_t)strtoul(argv[9], NULL, 10);
    }

    UpxPipeline *pipeline = upx_pipeline_load(argv[1], argv[2], NULL);
    if (!pipeline)
        return fail("loading the model", UPX_STATUS_INVALID_INPUT);

    UpxImage *image = NULL;
    status = upx_generate(pipeline, argv[4], &settings, print_progress, NULL, &image);
    if (status != UPX_STATUS_OK) {
        fail("generating", status); /* before upx_pipeline_free: the message is the last call's */
        upx_pipeline_free(pipeline);
        return (int)status;
    }
    FILE *out = fopen(argv[3], "wb");
    int written = out && fwrite(image->png, 1, image->png_len, out) == image->png_len;
    if (out && fclose(out) != 0)
        written = 0;
    if (!written) {
        perror(argv[3]);
        upx_image_free(image);
        upx_pipeline_free(pipeline);
        return 1;
    }
    printf("wrote %s: %ux%u, seed %llu\n", argv[3], (unsigned)image->width,
           (unsigned)image->height, (unsigned long long)image->seed);
    upx_image_free(image);

    image = NULL;
    status = upx_generate(pipeline, argv[4], &settings, cancel_after_first_step, pipeline,
                          &image);
    if (status != UPX_STATUS_CANCELLED || image != NULL) {
        fprintf(stderr, "the cancelled generation returned status %d\n", (int)status);
        upx_image_free(image);
        upx_pipeline_free(pipeline);
        return 1;
    }
    printf("second generation cancelled: %s\n", upx_last_error());
    upx_pipeline_free(pipeline);
    return 0;
}

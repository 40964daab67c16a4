#include "gpu_internal.h"

#include "kvd_error.h"
#include "shader_registry.h"

#include <stdlib.h>
#include <string.h>

int gpu_pipeline_new(struct gpu_device *dev, const struct gpu_pipeline_desc *desc,
                     struct gpu_pipeline **ret) {
  const struct gpu_caps *c = &dev->caps;
  const struct shader_spirv *spv = shader_spirv_find(desc->shader);
  if (!spv && dev->extra_shaders) spv = dev->extra_shaders(desc->shader);
  if (!spv) return gpu__fail(KVD_ENOENT, "no embedded shader named '%s'", desc->shader);
  if (desc->n_buffers > GPU_MAX_BINDINGS || desc->n_spec > GPU_MAX_SPEC ||
      desc->push_size > GPU_MAX_PUSH_BYTES || desc->push_size % 4)
    return gpu__fail(KVD_EINVAL, "pipeline '%s': bad descriptor (%u buffers, %u push bytes)",
                     desc->shader, desc->n_buffers, desc->push_size);
  if (desc->push_size > c->max_push_bytes)
    return gpu__fail(KVD_E_LIMIT, "pipeline '%s': %u push-constant bytes > device limit %u",
                     desc->shader, desc->push_size, c->max_push_bytes);
  uint64_t inv = 1;
  for (int i = 0; i < 3; i++) {
    uint32_t ls = desc->local_size[i] ? desc->local_size[i] : 1;
    if (ls > c->max_wg_size[i])
      return gpu__fail(KVD_E_LIMIT, "pipeline '%s': workgroup size[%d]=%u > device limit %u",
                       desc->shader, i, ls, c->max_wg_size[i]);
    inv *= ls;
  }
  if (inv > c->max_wg_invocations)
    return gpu__fail(KVD_E_LIMIT, "pipeline '%s': %llu invocations per workgroup > limit %u",
                     desc->shader, (unsigned long long)inv, c->max_wg_invocations);

  struct gpu_pipeline *p = calloc(1, sizeof *p);
  if (!p) return KVD_ENOMEM;
  p->dev = dev;
  p->n_buffers = desc->n_buffers;
  p->push_size = desc->push_size;
  for (int i = 0; i < 3; i++)
    p->local_size[i] = desc->local_size[i] ? desc->local_size[i] : 1;
  snprintf(p->name, sizeof p->name, "%s", desc->shader);

  VkDescriptorSetLayoutBinding binds[GPU_MAX_BINDINGS];
  for (uint32_t i = 0; i < desc->n_buffers; i++) {
    binds[i] = (VkDescriptorSetLayoutBinding){
        .binding = i,
        .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
        .descriptorCount = 1,
        .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT,
    };
  }
  VkDescriptorSetLayoutCreateInfo dl = {
      .sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
      .bindingCount = desc->n_buffers,
      .pBindings = binds,
  };
  VkShaderModule module = VK_NULL_HANDLE;
  int rc = gpu__check(vkCreateDescriptorSetLayout(dev->device, &dl, NULL, &p->set_layout),
                      "vkCreateDescriptorSetLayout");
  if (rc < 0) goto fail;
  VkPushConstantRange pcr = {
      .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .offset = 0, .size = desc->push_size};
  VkPipelineLayoutCreateInfo pl = {
      .sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
      .setLayoutCount = 1,
      .pSetLayouts = &p->set_layout,
      .pushConstantRangeCount = desc->push_size ? 1 : 0,
      .pPushConstantRanges = &pcr,
  };
  rc = gpu__check(vkCreatePipelineLayout(dev->device, &pl, NULL, &p->layout),
                  "vkCreatePipelineLayout");
  if (rc < 0) goto fail;
  VkShaderModuleCreateInfo sm = {
      .sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
      .codeSize = spv->size,
      .pCode = spv->code,
  };
  rc = gpu__check(vkCreateShaderModule(dev->device, &sm, NULL, &module), "vkCreateShaderModule");
  if (rc < 0) goto fail;

  VkSpecializationMapEntry entries[GPU_MAX_SPEC];
  for (uint32_t i = 0; i < desc->n_spec; i++)
    entries[i] = (VkSpecializationMapEntry){.constantID = i, .offset = i * 4, .size = 4};
  VkSpecializationInfo spec = {
      .mapEntryCount = desc->n_spec,
      .pMapEntries = entries,
      .dataSize = desc->n_spec * 4,
      .pData = desc->spec,
  };
  VkComputePipelineCreateInfo ci = {
      .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
      .stage =
          {
              .sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
              .stage = VK_SHADER_STAGE_COMPUTE_BIT,
              .module = module,
              .pName = "main",
              .pSpecializationInfo = desc->n_spec ? &spec : NULL,
          },
      .layout = p->layout,
  };
  char what[128];
  snprintf(what, sizeof what, "vkCreateComputePipelines(%s)", desc->shader);
  rc = gpu__check(
      vkCreateComputePipelines(dev->device, dev->pipeline_cache, 1, &ci, NULL, &p->pipeline), what);
  if (rc < 0) {
    if (rc == KVD_E_VULKAN) rc = KVD_E_SHADER;
    goto fail;
  }
  vkDestroyShaderModule(dev->device, module, NULL);
  gpu__name_object(dev, VK_OBJECT_TYPE_PIPELINE, (uint64_t)(uintptr_t)p->pipeline, p->name);
  *ret = p;
  return 0;

fail:
  if (module) vkDestroyShaderModule(dev->device, module, NULL);
  gpu_pipeline_free(p);
  return rc;
}

void gpu_pipeline_free(struct gpu_pipeline *p) {
  if (!p) return;
  VkDevice d = p->dev->device;
  if (p->pipeline) vkDestroyPipeline(d, p->pipeline, NULL);
  if (p->layout) vkDestroyPipelineLayout(d, p->layout, NULL);
  if (p->set_layout) vkDestroyDescriptorSetLayout(d, p->set_layout, NULL);
  free(p);
}
